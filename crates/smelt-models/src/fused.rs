//! Fused CPU kernels with their backward passes, where the profile of a training step says
//! the chain of elementwise tensor operations costs more than the arithmetic:
//!
//! - [`gelu_tanh`]: GPT-2's GELU in one pass forward and one backward (instead of about ten
//!   full-size temporaries each way);
//! - [`gelu_erf`]: the exact GELU of BERT and ViT, with a vectorisable erf;
//! - [`layer_norm`]: one pass per row forward (keeping each row's mean and inverse deviation)
//!   and one backward for the input, scale and shift gradients together;
//! - [`swiglu`]: Llama's `silu(gate) * up` with both input gradients in one pass;
//! - [`cross_entropy`]: the mean next-token loss over a `[n, vocab]` logit matrix, computed
//!   row by row (row maximum, then exponentials summed in blocks); its gradient `softmax - onehot` is written in one
//!   pass, never materialising the log-probabilities;
//! - [`attention`]: scaled dot-product attention per head (causal and key-padding masks
//!   applied on the fly, grouped-query heads, optional dropout on the probabilities), its
//!   backward pass working from the stored probabilities.
//!
//! All are burn backend extensions for the CPU backend and autodiff over it. On other
//! devices the callers use the composed tensor operations instead ([`is_fusable`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Dispatch, Flex};
use burn::tensor::{Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::sync::Arc;

/// The variance floor of a LayerNorm.
#[derive(Clone, Copy, Debug)]
pub struct Epsilon(pub f64);

/// Target token ids of the rows of a logit matrix.
#[derive(Clone, Debug)]
pub struct Targets(pub Arc<Vec<u32>>);

#[backend_extension(Flex, Autodiff)]
pub trait FusedBackend: burn::backend::Backend {
    /// GELU with the tanh approximation, elementwise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Exact GELU, `x Φ(x)` (BERT's and ViT's `gelu`), elementwise.
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension with scale `gamma` and shift `beta`.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: Epsilon,
    ) -> FloatTensor<Self>;
    /// Mean cross-entropy of `[n, vocab]` logits against `targets`, as a `[1]` tensor.
    fn cross_entropy(logits: FloatTensor<Self>, targets: Targets) -> FloatTensor<Self>;
    /// SwiGLU's gate: `silu(gate) * up`, elementwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Scaled dot-product attention of `q [b, heads, t, d]` over `k`, `v`
    /// `[b, kv_heads, s, d]` (query head `h` reads key/value head `h / (heads / kv_heads)`).
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttentionSpec,
    ) -> FloatTensor<Self>;
}

/// What an attention call may look at.
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub scale: f32,
    /// Causal masking: query `i` sees keys `j <= past + i`; `None` sees every key.
    pub causal_past: Option<usize>,
    /// Keys that may be attended to, `[b, s]` row-major; `None`: all.
    pub key_valid: Option<Arc<Vec<bool>>>,
    /// Dropout on the probabilities: a `[b, heads, t, s]` mask of 0 and `1 / (1 - p)`.
    pub dropout: Option<Arc<Vec<f32>>>,
}

/// Whether the fused kernels serve tensors on `device` (the CPU, with or without autodiff).
pub fn is_fusable(device: &burn::tensor::Device) -> bool {
    crate::causal::is_cpu(device)
}

fn host(t: FlexTensor) -> (Vec<f32>, Vec<usize>) {
    let data = t.into_data();
    let shape = data.shape().to_vec();
    (
        data.convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 tensor"),
        shape,
    )
}

/// `t` with contiguous f32 storage: itself when it already has it (no copy, even when the
/// autograph shares it), otherwise a converted copy.
pub(crate) fn dense(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        return t;
    }
    FlexTensor::from_data(t.into_data().convert::<f32>())
}

/// The values of a tensor made by [`dense`].
pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a dense f32 tensor")
}

pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

pub(crate) fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Elements per parallel task of the elementwise kernels.
pub(crate) const CHUNK: usize = 1 << 14;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

/// `e^x` for f32, within a few ulp (relative error below 5e-7) where it is finite; written so that
/// loops over slices vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // e^x = 2^k · e^r with k = round(x / ln 2), |r| <= ln2 / 2.
    // Round to nearest by adding and subtracting 1.5 · 2^23 (vectorises, unlike `round`).
    let k = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    // Degree-6 Taylor polynomial of e^r on |r| <= 0.35.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((k as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `tanh` through [`exp`]; for small arguments a series avoids the cancellation of
/// `(e^{2u} - 1)`.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let a = u.abs();
    let e = exp(2.0 * a);
    let big = 1.0 - 2.0 / (e + 1.0);
    let u2 = u * u;
    let small = a * (1.0 - u2 * (1.0 / 3.0 - u2 * (2.0 / 15.0 - u2 * (17.0 / 315.0))));
    let t = if a < 0.125 { small } else { big };
    t.copysign(u)
}

vectorized! {
    fn gelu_tanh_chunk(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let u = SQRT_2_OVER_PI * (x + GELU_A * x * x * x);
            *y = 0.5 * x * (1.0 + tanh(u));
        }
    }

    fn gelu_tanh_grad_chunk(dx: &mut [f32], x: &[f32], g: &[f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let x2 = x * x;
            let t = tanh(SQRT_2_OVER_PI * (x + GELU_A * x2 * x));
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * x2);
            *dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
        }
    }

    fn gelu_erf_chunk(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }

    fn gelu_erf_grad_chunk(dx: &mut [f32], x: &[f32], g: &[f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *dx = g * (cdf + x * pdf);
        }
    }

    fn swiglu_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + exp(-g)) * u;
        }
    }

    fn swiglu_grad_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for i in 0..g.len() {
            let s = 1.0 / (1.0 + exp(-g[i]));
            let silu = g[i] * s;
            du[i] = dy[i] * silu;
            dg[i] = dy[i] * u[i] * (s + silu * (1.0 - s));
        }
    }
}

/// `f(out_chunk, in_chunk)` over matching chunks of `x`, in parallel, into a new buffer.
fn map_chunks(x: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| f(y, x));
    y
}

/// `f(out_chunk, a_chunk, b_chunk)` over matching chunks, in parallel, into a new buffer.
fn zip_chunks(a: &[f32], b: &[f32], f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| f(y, a, b));
    y
}

fn gelu_forward(x: &[f32]) -> Vec<f32> {
    map_chunks(x, gelu_tanh_chunk)
}

fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    zip_chunks(x, g, gelu_tanh_grad_chunk)
}

/// `erf(x)` within 1.5e-7 (Abramowitz and Stegun 7.1.26), vectorisable.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp(-a * a)).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

fn gelu_erf_forward(x: &[f32]) -> Vec<f32> {
    map_chunks(x, gelu_erf_chunk)
}

fn gelu_erf_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    zip_chunks(x, g, gelu_erf_grad_chunk)
}

/// Rows per parallel task of the LayerNorm kernels.
fn norm_rows(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// LayerNorm of `[rows, width]` rows; returns the output and each row's (mean, 1 / std).
fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<(f32, f32)>) {
    let w = gamma.len();
    let rows = x.len() / w;
    let mut y = vec![0f32; x.len()];
    let mut stats = vec![(0f32, 0f32); rows];
    let step = norm_rows(w);
    y.par_chunks_mut(step * w)
        .zip(x.par_chunks(step * w))
        .zip(stats.par_chunks_mut(step))
        .for_each(|((y, x), stats)| layer_norm_rows(y, x, stats, (gamma, beta), eps));
    (y, stats)
}

vectorized! {
    /// LayerNorm of whole rows of `x` into `y`, with each row's (mean, 1 / std).
    fn layer_norm_rows(
        y: &mut [f32],
        x: &[f32],
        stats: &mut [(f32, f32)],
        (gamma, beta): (&[f32], &[f32]),
        eps: f64,
    ) {
        let w = gamma.len();
        for ((y, x), st) in y.chunks_exact_mut(w).zip(x.chunks_exact(w)).zip(stats) {
            let mean = lanes_sum(x) / w as f32;
            // The centred values go through `y` to get the variance in one more pass.
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x - mean;
            }
            let var = lanes_dot(y, y) as f64 / w as f64;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            for ((y, &g), &b) in y.iter_mut().zip(gamma).zip(beta) {
                *y = *y * rstd * g + b;
            }
            *st = (mean, rstd);
        }
    }

    /// LayerNorm's input gradient for whole rows, adding each row's scale and shift
    /// gradients to `dgamma` and `dbeta`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_grad_rows(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        stats: &[(f32, f32)],
        gamma: &[f32],
        (dgamma, dbeta): (&mut [f32], &mut [f32]),
        (xhat, gx): (&mut [f32], &mut [f32]),
    ) {
        let w = gamma.len();
        for (((dx, x), dy), &(mean, rstd)) in dx
            .chunks_exact_mut(w)
            .zip(x.chunks_exact(w))
            .zip(dy.chunks_exact(w))
            .zip(stats)
        {
            for j in 0..w {
                xhat[j] = (x[j] - mean) * rstd;
                gx[j] = dy[j] * gamma[j];
                dgamma[j] += dy[j] * xhat[j];
                dbeta[j] += dy[j];
            }
            let mg = lanes_sum(gx) / w as f32;
            let mgx = lanes_dot(gx, xhat) / w as f32;
            for j in 0..w {
                dx[j] = rstd * (gx[j] - mg - xhat[j] * mgx);
            }
        }
    }
}

/// Gradients of LayerNorm: `(dx, dgamma, dbeta)`.
fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[(f32, f32)],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = gamma.len();
    let mut dx = vec![0f32; x.len()];
    let step = norm_rows(w);
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(step * w)
        .zip(x.par_chunks(step * w).zip(dy.par_chunks(step * w)))
        .zip(stats.par_chunks(step))
        .map(|((dx, (x, dy)), stats)| {
            let mut dgamma = vec![0f32; w];
            let mut dbeta = vec![0f32; w];
            let mut xhat = vec![0f32; w];
            let mut gx = vec![0f32; w];
            layer_norm_grad_rows(
                dx,
                x,
                dy,
                stats,
                gamma,
                (&mut dgamma, &mut dbeta),
                (&mut xhat, &mut gx),
            );
            (dgamma, dbeta)
        })
        .collect();
    let mut dgamma = vec![0f32; w];
    let mut dbeta = vec![0f32; w];
    for (g, b) in partial {
        for j in 0..w {
            dgamma[j] += g[j];
            dbeta[j] += b[j];
        }
    }
    (dx, dgamma, dbeta)
}

fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    zip_chunks(g, u, swiglu_chunk)
}

/// Gradients of `silu(g) * u` with respect to `g` and `u`.
fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (g, (u, dy)))| swiglu_grad_chunk(dg, du, g, u, dy));
    (dg, du)
}

const LANES: usize = 8;

/// The largest value of `x` (NEG_INFINITY when empty), in lanes so that the loop vectorises.
#[inline(always)]
pub(crate) fn lanes_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    rest.iter()
        .chain(m.iter())
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// `sum(a[i] * b[i])` in f32 lanes (pairwise over the lanes, so long rows lose little).
#[inline(always)]
fn lanes_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum(x)` in f32 lanes.
#[inline(always)]
pub(crate) fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `c[m, n] (+)= beta · a[m, k] · b[k, n]` for row-major `c`, with `a` and `b` given by
/// their row and column strides.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
    beta: f32,
) {
    assert!(c.len() >= m * n);
    // SAFETY: `c` holds `m·n` values; the strides address only elements inside `a` and `b`
    // (every caller passes whole matrices of the stated shapes). One head's product runs on
    // one thread: the heads themselves are the parallel tasks.
    unsafe {
        crate::fused_linear::scaled_product(
            (m, n, k),
            (a, (a_rs, a_cs)),
            (b, (b_rs, b_cs)),
            c.as_mut_ptr(),
            (accumulate, beta),
            false,
        );
    }
}

struct AttnShape {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl AttnShape {
    fn of(q: &[usize], k: &[usize]) -> Self {
        assert_eq!(q.len(), 4, "attention takes [b, heads, t, d]");
        assert_eq!(k.len(), 4, "attention takes [b, kv_heads, s, d]");
        assert_eq!((q[0], q[3]), (k[0], k[3]), "batch and head width agree");
        assert!(k[1] > 0 && q[1] % k[1] == 0, "kv heads divide heads");
        Self {
            b: q[0],
            heads: q[1],
            kv_heads: k[1],
            t: q[2],
            s: k[2],
            d: q[3],
        }
    }
}

/// Forward pass: the output `[b, heads, t, d]` and the probabilities `[b, heads, t, s]`.
fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: &AttnShape,
    spec: &AttentionSpec,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        heads,
        kv_heads,
        t,
        s,
        d,
    } = *sh;
    let groups = heads / kv_heads;
    let mut out = vec![0f32; b * heads * t * d];
    let mut probs = vec![0f32; b * heads * t * s];
    out.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(t * s))
        .enumerate()
        .for_each(|(bh, (o, p))| {
            let (bi, h) = (bh / heads, bh % heads);
            let kv = bi * kv_heads + h / groups;
            let qh = &q[bh * t * d..(bh + 1) * t * d];
            let kh = &k[kv * s * d..(kv + 1) * s * d];
            let vh = &v[kv * s * d..(kv + 1) * s * d];
            mm((t, s, d), qh, (d, 1), kh, (1, d), p, false, spec.scale);
            for i in 0..t {
                let row = &mut p[i * s..(i + 1) * s];
                let limit = spec.causal_past.map_or(s, |past| (past + i + 1).min(s));
                if spec.key_valid.is_none() {
                    // Keys 0..limit, the rest masked: loops that vectorise.
                    let (live, dead) = row.split_at_mut(limit);
                    dead.fill(0.0);
                    softmax_in_place(live);
                    continue;
                }
                let valid =
                    |j: usize| j < limit && spec.key_valid.as_ref().is_none_or(|kv| kv[bi * s + j]);
                let mut max = f32::NEG_INFINITY;
                for (j, x) in row.iter().enumerate() {
                    if valid(j) {
                        max = max.max(*x);
                    }
                }
                if max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let mut sum = 0f64;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if valid(j) { exp(*x - max) } else { 0.0 };
                    sum += *x as f64;
                }
                let inv = (1.0 / sum) as f32;
                for x in row.iter_mut() {
                    *x *= inv;
                }
            }
            match &spec.dropout {
                Some(mask) => {
                    let m = &mask[bh * t * s..(bh + 1) * t * s];
                    let dropped: Vec<f32> = p.iter().zip(m).map(|(a, b)| a * b).collect();
                    mm((t, d, s), &dropped, (s, 1), vh, (d, 1), o, false, 1.0);
                }
                None => mm((t, d, s), p, (s, 1), vh, (d, 1), o, false, 1.0),
            }
        });
    (out, probs)
}

/// Backward pass: gradients of `q`, `k` and `v`.
fn attention_backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    probs: &[f32],
    dout: &[f32],
    sh: &AttnShape,
    (scale, dropout): (f32, Option<&[f32]>),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape {
        b,
        heads,
        kv_heads,
        t,
        s,
        d,
    } = *sh;
    let groups = heads / kv_heads;
    let mut dq = vec![0f32; b * heads * t * d];
    let mut dk = vec![0f32; b * kv_heads * s * d];
    let mut dv = vec![0f32; b * kv_heads * s * d];
    // One task per key/value head, so the query heads sharing it accumulate without races.
    dq.par_chunks_mut(groups * t * d)
        .zip(dk.par_chunks_mut(s * d).zip(dv.par_chunks_mut(s * d)))
        .enumerate()
        .for_each(|(kv, (dq, (dk, dv)))| {
            let kh = &k[kv * s * d..(kv + 1) * s * d];
            let vh = &v[kv * s * d..(kv + 1) * s * d];
            let mut dp = vec![0f32; t * s];
            for g in 0..groups {
                let bh = kv * groups + g;
                let qh = &q[bh * t * d..(bh + 1) * t * d];
                let ph = &probs[bh * t * s..(bh + 1) * t * s];
                let doh = &dout[bh * t * d..(bh + 1) * t * d];
                let mask = dropout.map(|m| &m[bh * t * s..(bh + 1) * t * s]);
                // dV += (P ⊙ M)ᵀ · dO
                match mask {
                    Some(m) => {
                        let dropped: Vec<f32> = ph.iter().zip(m).map(|(a, b)| a * b).collect();
                        mm((s, d, t), &dropped, (1, s), doh, (d, 1), dv, g > 0, 1.0);
                    }
                    None => mm((s, d, t), ph, (1, s), doh, (d, 1), dv, g > 0, 1.0),
                }
                // dP = (dO · Vᵀ) ⊙ M, then dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place.
                mm((t, s, d), doh, (d, 1), vh, (1, d), &mut dp, false, 1.0);
                if let Some(m) = mask {
                    for (x, &mj) in dp.iter_mut().zip(m) {
                        *x *= mj;
                    }
                }
                softmax_grad_rows(&mut dp, ph, s);
                // dQ = dS · K · scale; dK += dSᵀ · Q · scale
                mm(
                    (t, d, s),
                    &dp,
                    (s, 1),
                    kh,
                    (d, 1),
                    &mut dq[g * t * d..(g + 1) * t * d],
                    false,
                    scale,
                );
                mm((s, d, t), &dp, (1, s), qh, (d, 1), dk, g > 0, scale);
            }
        });
    (dq, dk, dv)
}

vectorized! {
    /// Softmax of `x` in place (nothing to do when empty).
    fn softmax_in_place(x: &mut [f32]) {
        if x.is_empty() {
            return;
        }
        let max = lanes_max(x);
        for v in x.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / lanes_sum(x);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }

    /// Through softmax backwards, row by row of width `s`: `dp ← p ⊙ (dp − rowsum(p ⊙ dp))`.
    fn softmax_grad_rows(dp: &mut [f32], p: &[f32], s: usize) {
        for (row, p) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
            let dot = lanes_dot(p, row);
            for (x, &pj) in row.iter_mut().zip(p) {
                *x = pj * (*x - dot);
            }
        }
    }

    /// `(log-sum-exp, logit of the target)` of one logit row.
    fn row_lse(row: &[f32], target: usize) -> (f32, f32) {
        let max = lanes_max(row);
        // Blocks summed in f64: an f32 running sum over a 50k vocabulary drifts by 1e-5,
        // which no longer cancels in the gradient (`softmax - onehot` must sum to zero).
        let sum: f64 = row
            .chunks(LSE_BLOCK)
            .map(|block| lanes_exp_sum(block, max) as f64)
            .sum();
        (max + sum.ln() as f32, row[target])
    }

    /// One row of the cross-entropy gradient: `s · (softmax(row) − onehot(target))`.
    fn cross_entropy_grad_row(
        d: &mut [std::mem::MaybeUninit<f32>],
        row: &[f32],
        (target, lse, s): (usize, f32, f32),
    ) {
        for (d, &v) in d.iter_mut().zip(row) {
            d.write(s * exp(v - lse));
        }
        d[target].write(s * exp(row[target] - lse) - s);
    }
}

/// `sum(e^(x[i] - shift))` in f32 lanes.
#[inline(always)]
fn lanes_exp_sum(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Logits per block of the log-sum-exp: summed in f32 lanes inside a block, blocks in f64.
const LSE_BLOCK: usize = 256;

/// Per row: `(log-sum-exp, logit of the target)`.
fn row_stats(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<(f32, f32)> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_lse(row, t as usize))
        .collect()
}

fn cross_entropy_forward(logits: &[f32], vocab: usize, targets: &[u32]) -> (f32, Vec<f32>) {
    let stats = row_stats(logits, vocab, targets);
    let n = stats.len().max(1) as f64;
    let loss = stats.iter().map(|&(lse, t)| (lse - t) as f64).sum::<f64>() / n;
    (loss as f32, stats.iter().map(|s| s.0).collect())
}

fn cross_entropy_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
    lse: &[f32],
    scale: f32,
) -> Vec<f32> {
    let len = logits.len();
    // Every row must have its target and log-sum-exp, or rows would stay unwritten.
    assert_eq!(targets.len() * vocab, len, "one target per logit row");
    assert_eq!(lse.len(), targets.len(), "one log-sum-exp per logit row");
    let mut dx = Vec::<f32>::with_capacity(len);
    let n = targets.len().max(1) as f32;
    let s = scale / n;
    if vocab > 0 {
        dx.spare_capacity_mut()[..len]
            .par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(targets.par_iter().zip(lse.par_iter()))
            .for_each(|((d, row), (&t, &lse))| {
                cross_entropy_grad_row(d, row, (t as usize, lse, s))
            });
    }
    // SAFETY: the loop above wrote every row of `vocab` values (one row per target, and the
    // caller checked that the rows and targets agree).
    unsafe { dx.set_len(len) };
    dx
}

fn check_targets(targets: &[u32], n: usize, vocab: usize) {
    assert_eq!(targets.len(), n, "one target per logit row");
    assert!(
        targets.iter().all(|&t| (t as usize) < vocab),
        "targets within the vocabulary"
    );
}

impl FusedBackend for Flex {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = dense(x);
        flex(gelu_forward(values(&x)), dims(&x))
    }

    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = dense(x);
        flex(gelu_erf_forward(values(&x)), dims(&x))
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: Epsilon,
    ) -> FloatTensor<Self> {
        let (x, g, b) = (dense(x), dense(gamma), dense(beta));
        let y = layer_norm_forward(values(&x), values(&g), values(&b), epsilon.0).0;
        flex(y, dims(&x))
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: Targets) -> FloatTensor<Self> {
        let logits = dense(logits);
        let shape = dims(&logits);
        check_targets(&targets.0, shape[0], shape[1]);
        let (loss, _) = cross_entropy_forward(values(&logits), shape[1], &targets.0);
        flex(vec![loss], vec![1])
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (g, shape) = host(gate);
        let (u, _) = host(up);
        flex(swiglu_forward(&g, &u), shape)
    }

    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttentionSpec,
    ) -> FloatTensor<Self> {
        let (q, qs) = host(q);
        let (k, ks) = host(k);
        let (v, _) = host(v);
        let sh = AttnShape::of(&qs, &ks);
        flex(attention_forward(&q, &k, &v, &sh, &spec).0, qs)
    }
}

#[derive(Debug)]
struct AttentionBackward {
    scale: f32,
    dropout: Option<Arc<Vec<f32>>>,
}

impl Backward<Flex, 3> for AttentionBackward {
    /// Inputs (contiguous host copies with their shapes) and the probabilities.
    type State = (
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Vec<usize>,
        Vec<usize>,
        Vec<f32>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [qn, kn, vn] = ops.parents;
        let dout = grads.consume::<Flex>(&ops.node);
        let (q, k, v, qs, ks, probs) = ops.state;
        let (dout, _) = host(dout);
        let sh = AttnShape::of(&qs, &ks);
        let (dq, dk, dv) = attention_backward(
            (&q, &k, &v),
            &probs,
            &dout,
            &sh,
            (self.scale, self.dropout.as_deref().map(Vec::as_slice)),
        );
        if let Some(node) = qn {
            grads.register::<Flex>(node.id, flex(dq, qs));
        }
        if let Some(node) = kn {
            grads.register::<Flex>(node.id, flex(dk, ks.clone()));
        }
        if let Some(node) = vn {
            grads.register::<Flex>(node.id, flex(dv, ks));
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [gate_node, up_node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (g, shape) = host(ops.state.0);
        let (u, _) = host(ops.state.1);
        let (dy, _) = host(dy);
        let (dg, du) = swiglu_backward(&g, &u, &dy);
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, flex(dg, shape.clone()));
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, flex(du, shape));
        }
    }
}

#[derive(Debug)]
struct GeluBackward {
    /// The exact GELU rather than the tanh approximation.
    erf: bool,
}

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        if let Some(node) = parent {
            let x = dense(ops.state);
            let g = dense(g);
            let dx = if self.erf {
                gelu_erf_backward(values(&x), values(&g))
            } else {
                gelu_backward(values(&x), values(&g))
            };
            grads.register::<Flex>(node.id, flex(dx, dims(&x)));
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    /// The input and scale (dense, shared with the graph) and each row's statistics.
    type State = (FlexTensor, FlexTensor, Vec<(f32, f32)>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [xn, gn, bn] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let dy = dense(dy);
        let (dx, dgamma, dbeta) =
            layer_norm_backward(values(&x), values(&gamma), &stats, values(&dy));
        let w = dgamma.len();
        let shape = dims(&x);
        if let Some(node) = xn {
            grads.register::<Flex>(node.id, flex(dx, shape));
        }
        if let Some(node) = gn {
            grads.register::<Flex>(node.id, flex(dgamma, vec![w]));
        }
        if let Some(node) = bn {
            grads.register::<Flex>(node.id, flex(dbeta, vec![w]));
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward {
    targets: Arc<Vec<u32>>,
}

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// The logits (dense, shared with the graph) and each row's log-sum-exp.
    type State = (FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        if let Some(node) = parent {
            let (logits, lse) = ops.state;
            let shape = dims(&logits);
            let (g, _) = host(g);
            let dx = cross_entropy_backward(values(&logits), shape[1], &self.targets, &lse, g[0]);
            grads.register::<Flex>(node.id, flex(dx, shape));
        }
    }
}

impl<C: CheckpointStrategy> FusedBackend for Autodiff<Flex, C> {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match (GeluBackward { erf: true })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = dense(x.primitive().clone());
                let out = <Flex as FusedBackend>::gelu_erf(input.clone());
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<Flex as FusedBackend>::gelu_erf(x.into_primitive()))
            }
        }
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: Epsilon,
    ) -> FloatTensor<Self> {
        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xh = dense(x.primitive().clone());
                let gh = dense(gamma.primitive().clone());
                let bh = dense(beta.primitive().clone());
                let (y, stats) =
                    layer_norm_forward(values(&xh), values(&gh), values(&bh), epsilon.0);
                let out = flex(y, dims(&xh));
                prep.finish((xh, gh, stats), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedBackend>::layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                epsilon,
            )),
        }
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match (GeluBackward { erf: false })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = dense(x.primitive().clone());
                let out = <Flex as FusedBackend>::gelu_tanh(input.clone());
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<Flex as FusedBackend>::gelu_tanh(x.into_primitive()))
            }
        }
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: Targets) -> FloatTensor<Self> {
        let op = CrossEntropyBackward {
            targets: targets.0.clone(),
        };
        match op.prepare::<C>([logits.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let input = dense(logits.primitive().clone());
                let shape = dims(&input);
                check_targets(&targets.0, shape[0], shape[1]);
                let (loss, lse) = cross_entropy_forward(values(&input), shape[1], &targets.0);
                prep.finish((input, lse), flex(vec![loss], vec![1]))
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedBackend>::cross_entropy(
                logits.into_primitive(),
                targets,
            )),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (g, u) = (gate.primitive().clone(), up.primitive().clone());
                let out = <Flex as FusedBackend>::swiglu(g.clone(), u.clone());
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedBackend>::swiglu(
                gate.into_primitive(),
                up.into_primitive(),
            )),
        }
    }

    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: AttentionSpec,
    ) -> FloatTensor<Self> {
        let op = AttentionBackward {
            scale: spec.scale,
            dropout: spec.dropout.clone(),
        };
        match op
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (qh, qs) = host(q.primitive().clone());
                let (kh, ks) = host(k.primitive().clone());
                let (vh, _) = host(v.primitive().clone());
                let sh = AttnShape::of(&qs, &ks);
                let (out, probs) = attention_forward(&qh, &kh, &vh, &sh, &spec);
                let out = flex(out, qs.clone());
                prep.finish((qh, kh, vh, qs, ks, probs), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedBackend>::attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                spec,
            )),
        }
    }
}

/// Scaled dot-product attention on the CPU (see [`FusedBackend::attention`]); callers use
/// composed operations on other devices ([`is_fusable`]).
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, spec: AttentionSpec) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedBackend>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        spec,
    ))
}

/// `silu(gate) * up` (SwiGLU): fused on the CPU, composed elsewhere.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !is_fusable(&gate.device()) {
        return burn::tensor::activation::silu(gate) * up;
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// GELU (tanh approximation) of `x`: fused on the CPU, composed elsewhere.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !is_fusable(&x.device()) {
        let c = (2.0f64 / std::f64::consts::PI).sqrt();
        let inner = (x.clone() + x.clone() * x.clone() * x.clone() * 0.044715) * c;
        return x * (inner.tanh() + 1.0) * 0.5;
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::gelu_tanh(x.into_dispatch()))
}

/// Exact GELU of `x`: fused on the CPU, composed elsewhere.
pub fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !is_fusable(&x.device()) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::gelu_erf(x.into_dispatch()))
}

/// LayerNorm of `x` over its last dimension: fused on the CPU, composed elsewhere.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if !is_fusable(&x.device()) {
        return burn::tensor::module::layer_norm(x, gamma, Some(beta), epsilon);
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        Epsilon(epsilon),
    ))
}

/// Mean cross-entropy of `[n, vocab]` logits against target ids: fused on the CPU, composed
/// elsewhere. Targets must be below `vocab`.
pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = logits.device();
    if !is_fusable(&device) {
        let t = Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(
                targets.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [targets.len()],
            ),
            &device,
        );
        return crate::bert::cross_entropy(logits, t);
    }
    Tensor::from_dispatch(<Dispatch as FusedBackend>::cross_entropy(
        logits.into_dispatch(),
        Targets(Arc::new(targets.to_vec())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn swiglu_matches_the_composed_form_and_its_gradients() {
        let device = Device::flex().autodiff();
        let n = 300;
        let run = |fused: bool| {
            let g = Tensor::<2>::from_data(TensorData::new(values(n, 1.0), [3, n / 3]), &device)
                .require_grad();
            let u = Tensor::<2>::from_data(TensorData::new(values(n, 4.0), [3, n / 3]), &device)
                .require_grad();
            let y = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                burn::tensor::activation::silu(g.clone()) * u.clone()
            };
            let w = Tensor::<2>::from_data(TensorData::new(values(n, 7.0), [3, n / 3]), &device);
            let grads = (y.clone() * w).sum().backward();
            let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            (v(y), v(g.grad(&grads).unwrap()), v(u.grad(&grads).unwrap()))
        };
        let (a, b) = (run(true), run(false));
        for (x, y) in [(a.0, b.0), (a.1, b.1), (a.2, b.2)] {
            for (p, q) in x.iter().zip(&y) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
    }

    /// Attention from composed tensor operations, with key/value heads repeated for the
    /// query heads that share them.
    fn composed_attention(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        spec: &AttentionSpec,
    ) -> Tensor<4> {
        let [b, heads, t, _] = q.dims();
        let [_, kv_heads, s, d] = k.dims();
        let groups = heads / kv_heads;
        let repeat = |x: Tensor<4>| {
            Tensor::cat(
                (0..heads)
                    .map(|h| {
                        x.clone()
                            .slice([0..b, h / groups..h / groups + 1, 0..s, 0..d])
                    })
                    .collect(),
                1,
            )
        };
        let mut mask = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let causal = spec.causal_past.is_some_and(|p| j > p + i);
                    let invalid = spec.key_valid.as_ref().is_some_and(|kv| !kv[bi * s + j]);
                    if causal || invalid {
                        mask[(bi * t + i) * s + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [b, 1, t, s]), &q.device());
        let scores = q.matmul(repeat(k).swap_dims(2, 3)) * spec.scale as f64 + mask;
        let probs = burn::tensor::activation::softmax(scores, 3);
        let probs = match &spec.dropout {
            Some(m) => {
                let m = Tensor::<4>::from_data(
                    TensorData::new(m.to_vec(), [b, heads, t, s]),
                    &probs.device(),
                );
                probs * m
            }
            None => probs,
        };
        probs.matmul(repeat(v))
    }

    #[test]
    fn fused_attention_matches_the_composed_one_with_its_gradients() {
        let device = Device::flex().autodiff();
        let (b, heads, kv_heads, t, past, d) = (2, 4, 2, 5, 3, 8);
        let s = past + t;
        let mut key_valid = vec![true; b * s];
        key_valid[0] = false; // a left-padded first row
        key_valid[1] = false;
        let mut spec = AttentionSpec {
            scale: 1.0 / (d as f32).sqrt(),
            causal_past: Some(past),
            key_valid: Some(Arc::new(key_valid)),
            dropout: None,
        };
        let tensor = |n: usize, seed: f32, shape: [usize; 4]| {
            Tensor::<4>::from_data(TensorData::new(values(n, seed), shape), &device).require_grad()
        };
        let run = |fused: bool, spec: &AttentionSpec| {
            let q = tensor(b * heads * t * d, 1.0, [b, heads, t, d]);
            let k = tensor(b * kv_heads * s * d, 2.0, [b, kv_heads, s, d]);
            let v = tensor(b * kv_heads * s * d, 3.0, [b, kv_heads, s, d]);
            let o = if fused {
                attention(q.clone(), k.clone(), v.clone(), spec.clone())
            } else {
                composed_attention(q.clone(), k.clone(), v.clone(), spec)
            };
            let w = Tensor::<4>::from_data(
                TensorData::new(values(b * heads * t * d, 5.0), [b, heads, t, d]),
                &device,
            );
            let grads = (o.clone() * w).sum().backward();
            let v4 = |x: Tensor<4>| x.into_data().try_to_vec::<f32>().unwrap();
            [
                v4(o),
                v4(q.grad(&grads).unwrap()),
                v4(k.grad(&grads).unwrap()),
                v4(v.grad(&grads).unwrap()),
            ]
        };
        let (a, c) = (run(true, &spec), run(false, &spec));
        for (name, (x, y)) in ["output", "dq", "dk", "dv"].iter().zip(a.iter().zip(&c)) {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 2e-5, "{name}: {p} vs {q}");
            }
        }
        // With dropout on the probabilities, and without the causal mask (BERT's case).
        let mask: Vec<f32> = (0..b * heads * t * s)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        spec.dropout = Some(Arc::new(mask));
        spec.causal_past = None;
        let (a, c) = (run(true, &spec), run(false, &spec));
        for (name, (x, y)) in ["output", "dq", "dk", "dv"].iter().zip(a.iter().zip(&c)) {
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 2e-5, "dropout {name}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            let t = tanh(x * 0.1);
            assert!((t - (x * 0.1).tanh()).abs() < 3e-7, "tanh({})", x * 0.1);
        }
        assert!(worst < 5e-7, "exp relative error {worst}");
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.731).sin() * 3.0)
            .collect()
    }

    #[test]
    fn fused_ops_match_the_composed_ones_forward_and_backward() {
        let device = Device::flex().autodiff();
        // One short row, and rows of several log-sum-exp blocks with a ragged tail.
        for (n, v) in [(7, 37), (5, 1003)] {
            let data = values(n * v, 0.5);
            let targets: Vec<u32> = (0..n as u32).map(|i| (i * 5) % v as u32).collect();
            let weights = values(n * v, 9.0);
            let run = |fused: bool| -> (f32, Vec<f32>, Vec<f32>) {
                let x = Tensor::<2>::from_data(TensorData::new(data.clone(), [n, v]), &device)
                    .require_grad();
                let w = Tensor::<2>::from_data(TensorData::new(weights.clone(), [n, v]), &device);
                let g = if fused {
                    gelu_tanh(x.clone())
                } else {
                    let c = (2.0f64 / std::f64::consts::PI).sqrt();
                    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
                    x.clone() * (inner.tanh() + 1.0) * 0.5
                };
                let loss = if fused {
                    cross_entropy(g.clone() * w.clone(), &targets)
                } else {
                    let t = Tensor::<1, burn::tensor::Int>::from_data(
                        TensorData::new(targets.iter().map(|&t| t as i64).collect::<Vec<_>>(), [n]),
                        &device,
                    );
                    crate::bert::cross_entropy(g.clone() * w, t)
                };
                let gs = g
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap();
                let l = loss.clone().into_scalar::<f32>();
                let grads = loss.backward();
                let dx = x
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                (l, gs, dx)
            };
            let (l1, g1, d1) = run(true);
            let (l2, g2, d2) = run(false);
            assert!((l1 - l2).abs() < 1e-5, "{l1} vs {l2}");
            for (a, b) in g1.iter().zip(&g2) {
                assert!((a - b).abs() < 1e-5, "gelu {a} vs {b}");
            }
            for (a, b) in d1.iter().zip(&d2) {
                assert!((a - b).abs() < 1e-6, "gradient {a} vs {b}");
            }
        }
    }

    #[test]
    fn fused_gelu_erf_and_layer_norm_match_the_composed_ones_with_gradients() {
        let device = Device::flex().autodiff();
        let (n, w) = (9, 24);
        let data: Vec<f32> = values(n * w, 1.5).iter().map(|v| 3.0 * v).collect();
        let gamma = values(w, 4.0);
        let beta = values(w, 7.0);
        let weights = values(n * w, 2.0);
        let run = |fused: bool| {
            let x = Tensor::<2>::from_data(TensorData::new(data.clone(), [n, w]), &device)
                .require_grad();
            let g =
                Tensor::<1>::from_data(TensorData::new(gamma.clone(), [w]), &device).require_grad();
            let b =
                Tensor::<1>::from_data(TensorData::new(beta.clone(), [w]), &device).require_grad();
            let m = Tensor::<2>::from_data(TensorData::new(weights.clone(), [n, w]), &device);
            let y = if fused {
                gelu_erf(layer_norm(x.clone(), g.clone(), b.clone(), 1e-5))
            } else {
                burn::tensor::activation::gelu(burn::tensor::module::layer_norm(
                    x.clone(),
                    g.clone(),
                    Some(b.clone()),
                    1e-5,
                ))
            };
            let out: Vec<f32> = y.clone().into_data().try_to_vec::<f32>().unwrap();
            let grads = (y * m).sum().backward();
            let vec = |t: Option<Tensor<2>>| t.unwrap().into_data().try_to_vec::<f32>().unwrap();
            let vec1 = |t: Option<Tensor<1>>| t.unwrap().into_data().try_to_vec::<f32>().unwrap();
            (
                out,
                vec(x.grad(&grads)),
                vec1(g.grad(&grads)),
                vec1(b.grad(&grads)),
            )
        };
        let fused = run(true);
        let composed = run(false);
        let close = |a: &[f32], b: &[f32], tol: f32, what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: {x} vs {y}");
            }
        };
        close(&fused.0, &composed.0, 1e-5, "output");
        close(&fused.1, &composed.1, 1e-4, "input gradient");
        close(&fused.2, &composed.2, 1e-4, "scale gradient");
        close(&fused.3, &composed.3, 1e-4, "shift gradient");
        for x in [-6.0f32, -2.5, -0.7, -1e-3, 0.0, 0.3, 1.1, 4.0] {
            let exact = libm_erf(x as f64);
            assert!((erf(x) as f64 - exact).abs() < 3e-7, "erf({x})");
        }
    }

    /// erf by its Taylor series (|x| < 3) or its asymptotic tail, in f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() >= 3.0 {
            let a = x.abs();
            let tail = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * a * a) + 3.0 / (4.0 * a.powi(4)));
            return (1.0 - tail).copysign(x);
        }
        let mut sum = 0.0;
        let mut term = x;
        for k in 0..200 {
            sum += term / (2 * k + 1) as f64;
            term *= -x * x / (k + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }
}
