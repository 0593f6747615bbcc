//! Batching: length-bucketed, seeded batch order and dynamic padding.

use crate::tokenize::Encoded;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A padded batch on the host, row-major `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// Positions of the rows in the source list.
    pub indices: Vec<usize>,
    pub input_ids: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

/// Pads the selected rows to the longest of them.
pub fn pad(encoded: &[Encoded], indices: &[usize], pad_id: u32) -> PaddedBatch {
    let seq = indices
        .iter()
        .map(|&i| encoded[i].ids.len())
        .max()
        .unwrap_or(0);
    let batch = indices.len();
    let mut input_ids = vec![pad_id as i64; batch * seq];
    let mut token_type_ids = vec![0; batch * seq];
    let mut attention_mask = vec![0; batch * seq];
    for (row, &i) in indices.iter().enumerate() {
        let e = &encoded[i];
        for (col, (&id, &ty)) in e.ids.iter().zip(&e.type_ids).enumerate() {
            input_ids[row * seq + col] = id as i64;
            token_type_ids[row * seq + col] = ty as i64;
            attention_mask[row * seq + col] = 1;
        }
    }
    PaddedBatch {
        indices: indices.to_vec(),
        input_ids,
        token_type_ids,
        attention_mask,
        batch,
        seq,
    }
}

/// How training examples are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// Similar lengths together (little padding, faster): see [`bucketed_batches`].
    Bucketed,
    /// Plain seeded shuffle, as most reference training loops do: see [`shuffled_batches`].
    Random,
}

impl std::str::FromStr for Batching {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bucketed" => Ok(Batching::Bucketed),
            "random" => Ok(Batching::Random),
            other => Err(format!(
                "unknown batching `{other}`: expected bucketed or random"
            )),
        }
    }
}

/// The batches of one epoch in the given [`Batching`] mode.
pub fn epoch_batches(
    batching: Batching,
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    match batching {
        Batching::Bucketed => bucketed_batches(lengths, batch_size, seed, epoch),
        Batching::Random => shuffled_batches(lengths.len(), batch_size, seed, epoch),
    }
}

fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The batches of one epoch: `0..n` shuffled with `(seed, epoch)` and cut in order.
pub fn shuffled_batches(n: usize, batch_size: usize, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut epoch_rng(seed, epoch));
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}

/// The batches of one training epoch: examples are shuffled with `(seed, epoch)`, grouped in
/// pools of 50 batches, sorted by length within a pool (so a batch holds similar lengths
/// and pads little) and the batches shuffled again. Same inputs, same batches.
pub fn bucketed_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Batches for inference: sorted by length for little padding; callers restore order
/// through [`PaddedBatch::indices`].
pub fn inference_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}

/// A seeded split of `0..n` into (train, valid) index lists, `valid_fraction` of them valid.
pub fn split_indices(n: usize, valid_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_valid = ((n as f64) * valid_fraction).round() as usize;
    let valid = order[..n_valid.min(n)].to_vec();
    let train = order[n_valid.min(n)..].to_vec();
    (train, valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketed_batches_cover_every_example_once_and_are_seeded() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 97 + 3).collect();
        let a = bucketed_batches(&lengths, 16, 42, 0);
        let b = bucketed_batches(&lengths, 16, 42, 0);
        let c = bucketed_batches(&lengths, 16, 42, 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Within a pool, lengths are sorted, so a batch's spread is far below the global one.
        let spread: usize = a
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .max()
            .unwrap();
        assert!(spread < 20, "max in-batch length spread {spread}");
    }

    #[test]
    fn shuffled_batches_are_a_seeded_permutation() {
        let a = shuffled_batches(100, 32, 3, 0);
        assert_eq!(a.len(), 4);
        assert_eq!(a[3].len(), 4);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled_batches(100, 32, 3, 0));
        assert_ne!(a, shuffled_batches(100, 32, 3, 1));
    }

    #[test]
    fn pad_fills_mask_and_pad_ids() {
        let enc = vec![
            Encoded {
                ids: vec![1, 2, 3],
                type_ids: vec![0, 0, 0],
            },
            Encoded {
                ids: vec![4],
                type_ids: vec![0],
            },
        ];
        let b = pad(&enc, &[0, 1], 9);
        assert_eq!(b.seq, 3);
        assert_eq!(b.input_ids, vec![1, 2, 3, 4, 9, 9]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn split_is_disjoint_and_seeded() {
        let (t, v) = split_indices(100, 0.2, 7);
        assert_eq!(v.len(), 20);
        assert_eq!(t.len(), 80);
        assert!(v.iter().all(|i| !t.contains(i)));
        assert_eq!(split_indices(100, 0.2, 7).1, v);
    }
}
