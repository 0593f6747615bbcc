//! A fused CPU forward pass for one sequence, working on host buffers.
//!
//! Token-by-token decoding on a small model is dominated by per-operation overhead when every
//! step goes through tensor operations: hundreds of small allocations, copies and thread
//! hand-offs per token. This path runs the same computation as [`CausalLm::forward_hidden`]
//! with preallocated buffers, an append-only key/value cache and the quantized kernels, so
//! the time goes to reading the weights. It is used for single-sequence generation on the
//! CPU; tests check it against the tensor path.

use crate::causal::{Arch, CausalLm, Linear, LmNorm};
use crate::error::{ModelError, Result};
use crate::fused::{exp, lanes_max, lanes_sum};
use crate::quant::{matmul_group, matvec_team, quantize, GgmlType, QMatrix};
use crate::team::Team;
use crate::weights::tensor_to_vec;
use rayon::prelude::*;
use std::sync::Arc;

struct HostNorm {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
}

impl HostNorm {
    fn new(n: &LmNorm) -> Result<Self> {
        Ok(Self {
            weight: tensor_to_vec(n.weight.val())?,
            bias: n
                .bias
                .as_ref()
                .map(|b| tensor_to_vec(b.val()))
                .transpose()?,
            eps: n.eps as f32,
        })
    }

    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let d = self.weight.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            match &self.bias {
                None => {
                    let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                    let inv = 1.0 / (ms + self.eps).sqrt();
                    for ((o, v), w) in or.iter_mut().zip(xr).zip(&self.weight) {
                        *o = v * inv * w;
                    }
                }
                Some(b) => {
                    let mean = xr.iter().sum::<f32>() / d as f32;
                    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                    let inv = 1.0 / (var + self.eps).sqrt();
                    for (((o, v), w), bb) in or.iter_mut().zip(xr).zip(&self.weight).zip(b) {
                        *o = (v - mean) * inv * w + bb;
                    }
                }
            }
        }
    }
}

struct HostLinear {
    m: Arc<QMatrix>,
    bias: Option<Vec<f32>>,
}

impl HostLinear {
    fn new(l: &Linear) -> Result<Self> {
        if l.lora.is_some() {
            return Err(crate::ModelError::Unsupported(
                "the host decoder runs merged weights; merge the adapter first".into(),
            ));
        }
        let m = match &l.quant {
            Some(q) => q.clone(),
            None => Arc::new(f32_matrix(l.weight_out_in()?, l.d_out, l.d_in)),
        };
        Ok(Self {
            m,
            bias: l.bias_values()?,
        })
    }
}

fn f32_matrix(values: Vec<f32>, rows: usize, cols: usize) -> QMatrix {
    let bytes = quantize(GgmlType::F32, &values).expect("f32 always encodes");
    QMatrix::new(GgmlType::F32, rows, cols, bytes).expect("sizes match")
}

/// Projections sharing an input, run as one group; biases added after. One row goes to the
/// team, several to the pool.
fn project(team: &Team, ls: &[&HostLinear], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let ms: Vec<&QMatrix> = ls.iter().map(|l| l.m.as_ref()).collect();
    let mut outs = if n == 1 {
        matvec_team(team, &ms, x)
    } else {
        matmul_group(&ms, x, n)
    };
    for (l, o) in ls.iter().zip(outs.iter_mut()) {
        if let Some(b) = &l.bias {
            for row in o.chunks_exact_mut(b.len()) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
    outs
}

struct HostBlock {
    attn_norm: HostNorm,
    q: HostLinear,
    k: HostLinear,
    v: HostLinear,
    o: HostLinear,
    mlp_norm: HostNorm,
    gate: Option<HostLinear>,
    up: HostLinear,
    down: HostLinear,
}

/// Host copies (or shared quantized matrices) of a model's weights for the fused CPU path.
pub struct HostModel {
    arch: Arch,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    context: usize,
    rope_theta: f64,
    embed: Arc<QMatrix>,
    positions: Option<Vec<f32>>,
    blocks: Vec<HostBlock>,
    final_norm: HostNorm,
    head: Arc<QMatrix>,
    team: Team,
}

/// Keys and values of one sequence: per layer, `[position][kv_heads × head_dim]`.
#[derive(Clone)]
pub struct HostCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl HostCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl HostModel {
    /// Prepares `model` for the host path; quantized matrices are shared, not copied.
    pub fn new(model: &CausalLm) -> Result<Self> {
        let c = &model.config;
        let embed = match (&model.embed.quant, &model.embed.weight) {
            (Some(q), _) => q.clone(),
            (None, Some(w)) => {
                Arc::new(f32_matrix(tensor_to_vec(w.val())?, c.vocab_size, c.hidden))
            }
            (None, None) => {
                return Err(ModelError::Unsupported("embedding without weights".into()))
            }
        };
        let head = match &model.lm_head {
            Some(h) => HostLinear::new(h)?.m,
            None => embed.clone(),
        };
        let blocks = model
            .blocks
            .iter()
            .map(|b| {
                Ok(HostBlock {
                    attn_norm: HostNorm::new(&b.attn_norm)?,
                    q: HostLinear::new(&b.q)?,
                    k: HostLinear::new(&b.k)?,
                    v: HostLinear::new(&b.v)?,
                    o: HostLinear::new(&b.o)?,
                    mlp_norm: HostNorm::new(&b.mlp_norm)?,
                    gate: b.gate.as_ref().map(HostLinear::new).transpose()?,
                    up: HostLinear::new(&b.up)?,
                    down: HostLinear::new(&b.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            arch: c.arch,
            hidden: c.hidden,
            heads: c.heads,
            kv_heads: c.kv_heads,
            context: c.context,
            rope_theta: c.rope_theta,
            embed,
            positions: model
                .positions
                .as_ref()
                .map(|p| tensor_to_vec(p.val()))
                .transpose()?,
            blocks,
            final_norm: HostNorm::new(&model.final_norm)?,
            head,
            team: Team::for_pool(),
        })
    }

    pub fn new_cache(&self) -> HostCache {
        HostCache {
            k: vec![Vec::new(); self.blocks.len()],
            v: vec![Vec::new(); self.blocks.len()],
            len: 0,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.head.rows
    }

    /// Runs `tokens` after the cached positions and returns the logits of the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut HostCache) -> Result<Vec<f32>> {
        let t = tokens.len();
        let d = self.hidden;
        let start = cache.len;
        if t == 0 {
            return Err(ModelError::Unsupported("no tokens to run".into()));
        }
        if start + t > self.context {
            return Err(ModelError::Unsupported(format!(
                "position {} is beyond the model's context of {} tokens",
                start + t - 1,
                self.context
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.embed.rows) {
            return Err(ModelError::Unsupported(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.embed.rows
            )));
        }
        let mut x = vec![0f32; t * d];
        for (row, &id) in x.chunks_exact_mut(d).zip(tokens) {
            self.embed.dequantize_row(id as usize, row);
        }
        if let Some(pos) = &self.positions {
            for (i, row) in x.chunks_exact_mut(d).enumerate() {
                let p = &pos[(start + i) * d..(start + i + 1) * d];
                row.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
        if t > 1 {
            // Several rows go to rayon's pool (GEMM tiles, attention); let the team sleep.
            self.team.rest();
        }
        let hd = d / self.heads;
        let kvd = self.kv_heads * hd;
        let rope = (self.arch == Arch::Llama).then(|| self.rope_table(start, t, hd));
        let mut h = vec![0f32; t * d];
        for (li, b) in self.blocks.iter().enumerate() {
            b.attn_norm.apply(&x, &mut h);
            let mut qkv = project(&self.team, &[&b.q, &b.k, &b.v], &h, t).into_iter();
            let (mut q, mut k, v) = (
                qkv.next().unwrap(),
                qkv.next().unwrap(),
                qkv.next().unwrap(),
            );
            if let Some((cos, sin)) = &rope {
                apply_rope(&mut q, self.heads, hd, cos, sin);
                apply_rope(&mut k, self.kv_heads, hd, cos, sin);
            }
            let kc = &mut cache.k[li];
            let vc = &mut cache.v[li];
            if kc.capacity() < (start + t) * kvd {
                let want = ((start + t) * kvd)
                    .max(kc.capacity() * 2)
                    .min(self.context * kvd);
                kc.reserve_exact(want - kc.len());
                vc.reserve_exact(want - vc.len());
            }
            kc.extend_from_slice(&k);
            vc.extend_from_slice(&v);
            let ctx = attention(
                &self.team,
                &q,
                kc,
                vc,
                t,
                start,
                self.heads,
                self.kv_heads,
                hd,
            );
            let o = project(&self.team, &[&b.o], &ctx, t).pop().unwrap();
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            b.mlp_norm.apply(&x, &mut h);
            let inner = match &b.gate {
                Some(gate) => {
                    let mut gu = project(&self.team, &[gate, &b.up], &h, t).into_iter();
                    let (mut g, u) = (gu.next().unwrap(), gu.next().unwrap());
                    g.iter_mut()
                        .zip(&u)
                        .for_each(|(g, u)| *g = *g / (1.0 + exp(-*g)) * u);
                    g
                }
                None => {
                    let mut u = project(&self.team, &[&b.up], &h, t).pop().unwrap();
                    u.iter_mut().for_each(|v| *v = gelu_tanh(*v));
                    u
                }
            };
            let down = project(&self.team, &[&b.down], &inner, t).pop().unwrap();
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        cache.len = start + t;
        let last = &x[(t - 1) * d..];
        let mut normed = vec![0f32; d];
        self.final_norm.apply(last, &mut normed);
        Ok(matvec_team(&self.team, &[self.head.as_ref()], &normed)
            .pop()
            .expect("one output per matrix"))
    }

    fn rope_table(&self, start: usize, t: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let half = hd / 2;
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        for i in 0..t {
            let p = (start + i) as f64;
            for j in 0..half {
                let inv = 1.0 / self.rope_theta.powf(2.0 * j as f64 / hd as f64);
                let (s, c) = (p * inv).sin_cos();
                cos[i * half + j] = c as f32;
                sin[i * half + j] = s as f32;
            }
        }
        (cos, sin)
    }
}

/// Rotates halves of every head of `x` (`[t][heads × hd]`), as the tensor path does.
fn apply_rope(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (
            &cos[i * half..(i + 1) * half],
            &sin[i * half..(i + 1) * half],
        );
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * c[j] - x2 * s[j];
                b[j] = x2 * c[j] + x1 * s[j];
            }
        }
    }
}

/// Causal attention of `t` new queries (`[t][heads × hd]`) over the cached keys and values
/// (`[start + t][kv_heads × hd]`); query head `h` reads key/value head `h / (heads / kv_heads)`.
#[allow(clippy::too_many_arguments)]
fn attention(
    team: &Team,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    start: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> Vec<f32> {
    let groups = heads / kv_heads;
    let kvd = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; t * heads * hd];
    let one = |(idx, o): (usize, &mut [f32])| {
        let (i, h) = (idx / heads, idx % heads);
        let qh = &q[i * heads * hd + h * hd..][..hd];
        attend_head(
            qh,
            (k, v),
            ((h / groups) * hd, kvd),
            start + i + 1,
            scale,
            o,
        );
    };
    if t == 1 && team.threads() > 1 && start >= 16 {
        // One new token: its heads are shared out to the decoding team.
        let ptr = SendPtr(out.as_mut_ptr());
        let ptr = &ptr;
        team.run(&|i, n| {
            for h in crate::team::share(heads, i, n) {
                // SAFETY: each head's `hd` outputs belong to one member, and `out` outlives
                // the run.
                let o = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(h * hd), hd) };
                one((h, o));
            }
        });
    } else if t * (start + t) > 4096 {
        // Long contexts go to rayon's pool; the team must not spin against it.
        team.rest();
        out.par_chunks_mut(hd).enumerate().for_each(one);
    } else {
        out.chunks_mut(hd).enumerate().for_each(one);
    }
    out
}

vectorized! {
    /// One query head over the first `n` cached positions: `out += softmax(q·K) · V`, the
    /// head's keys and values at `offset` in rows of `stride` values.
    fn attend_head(
        qh: &[f32],
        (k, v): (&[f32], &[f32]),
        (offset, stride): (usize, usize),
        n: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = qh.len();
        let mut scores: Vec<f32> = (0..n)
            .map(|p| dot(qh, &k[p * stride + offset..][..hd]) * scale)
            .collect();
        let max = lanes_max(&scores);
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let inv_total = 1.0 / lanes_sum(&scores);
        for (p, s) in scores.iter().enumerate() {
            let w = s * inv_total;
            let vp = &v[p * stride + offset..][..hd];
            out.iter_mut().zip(vp).for_each(|(a, b)| *a += w * b);
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one buffer to the team's members.
unsafe impl Sync for SendPtr {}

/// A dot product in eight independent lanes, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}
