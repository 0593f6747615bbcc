//! AdamW's update of one parameter as one CPU pass.
//!
//! Composed from tensor operations the update takes about a dozen full passes over the
//! parameter, each with a fresh output buffer; here the parameter, its gradient and both
//! moments are read once and the three results written once.

use crate::fused::{dense, dims, flex, is_fusable, values, CHUNK};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Dispatch, Flex};
use burn::tensor::Tensor;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The scalars of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// Decoupled weight decay (0 for parameters that are not decayed).
    pub weight_decay: f64,
    /// The update's number, from 1 (for the bias corrections).
    pub t: i32,
}

#[backend_extension(Flex)]
pub trait OptimBackend: burn::backend::Backend {
    /// `(parameter, m, v)` after one AdamW update of `param` with `grad` and the moments.
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The update's constants, as f32.
#[derive(Clone, Copy)]
struct Coefficients {
    decay: f32,
    b1: f32,
    b2: f32,
    /// `1 - beta` rounded once from f64 (`1 - 0.999f32` is 1.3e-5 off in relative terms).
    one_minus_b1: f32,
    one_minus_b2: f32,
    inv_sqrt_bias2: f32,
    eps: f32,
    step: f32,
}

vectorized! {
    /// AdamW on one chunk: reads `p`, `g`, `m`, `v`, writes the new values into the outputs.
    fn adamw_chunk(
        (p, g, m, v): (&[f32], &[f32], &[f32], &[f32]),
        (po, mo, vo): (&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
        c: Coefficients,
    ) {
        for i in 0..p.len() {
            let mi = c.b1 * m[i] + c.one_minus_b1 * g[i];
            let vi = c.b2 * v[i] + c.one_minus_b2 * (g[i] * g[i]);
            let denom = vi.sqrt() * c.inv_sqrt_bias2 + c.eps;
            po[i].write(p[i] * c.decay - c.step * (mi / denom));
            mo[i].write(mi);
            vo[i].write(vi);
        }
    }
}

impl OptimBackend for Flex {
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, grad, m, v) = (dense(param), dense(grad), dense(m), dense(v));
        let shape = dims(&param);
        let (p, g, mv, vv) = (values(&param), values(&grad), values(&m), values(&v));
        let n = p.len();
        assert!(
            g.len() == n && mv.len() == n && vv.len() == n,
            "parameter, gradient and moments agree in size"
        );
        let bias1 = 1.0 - step.beta1.powi(step.t);
        let bias2 = 1.0 - step.beta2.powi(step.t);
        let c = Coefficients {
            decay: (1.0 - step.lr * step.weight_decay) as f32,
            b1: step.beta1 as f32,
            b2: step.beta2 as f32,
            one_minus_b1: (1.0 - step.beta1) as f32,
            one_minus_b2: (1.0 - step.beta2) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: step.epsilon as f32,
            step: (step.lr / bias1) as f32,
        };
        let fresh = || Vec::<f32>::with_capacity(n);
        let (mut po, mut mo, mut vo) = (fresh(), fresh(), fresh());
        po.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(
                mo.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(vo.spare_capacity_mut()[..n].par_chunks_mut(CHUNK)),
            )
            .enumerate()
            .for_each(|(i, (po, (mo, vo)))| {
                let r = i * CHUNK..(i * CHUNK + po.len());
                let inputs = (&p[r.clone()], &g[r.clone()], &mv[r.clone()], &vv[r]);
                adamw_chunk(inputs, (po, mo, vo), c);
            });
        // SAFETY: the chunks above cover `0..n` of all three buffers and write every value.
        unsafe {
            po.set_len(n);
            mo.set_len(n);
            vo.set_len(n);
        }
        (
            flex(po, shape.clone()),
            flex(mo, shape.clone()),
            flex(vo, shape),
        )
    }
}

/// One AdamW update: `Some((parameter, m, v))` on the CPU, `None` elsewhere (the caller
/// composes it from tensor operations). The results carry no autodiff association.
pub fn adamw(
    param: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    step: AdamStep,
) -> Option<(Tensor<1>, Tensor<1>, Tensor<1>)> {
    if !is_fusable(&param.device()) {
        return None;
    }
    // The state may come back from a checkpoint on the autodiff device; the update itself
    // is never differentiated.
    let plain = |t: Tensor<1>| t.without_autodiff().into_dispatch();
    let (p, m, v) =
        <Dispatch as OptimBackend>::adamw(plain(param), plain(grad), plain(m), plain(v), step);
    Some((
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    ))
}
