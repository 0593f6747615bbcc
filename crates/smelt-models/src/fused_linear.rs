//! The fully connected layer `y = x W + b` as one CPU kernel, with its backward pass.
//!
//! The generic path (burn's `linear`) costs more than its matrix products on the CPU backend:
//! every product's output is allocated zeroed and then copied once more to meet the backend's
//! alignment, the bias is added in a second pass and summed for its gradient in a third, and
//! inputs with 128-row batches run as one product per batch element. Here the output rows start
//! as copies of the bias and one product over all rows accumulates into them; the backward
//! pass writes the input and weight gradients straight from the matrix kernel into fresh
//! buffers, skipping whichever of them no parameter needs (frozen weights, inputs that are
//! not tracked), and sums the bias gradient in fixed row blocks so that results do not depend
//! on thread scheduling.
//!
//! Weights are `[d_in, d_out]` ([`WeightLayout::InOut`], the layout of [`crate::layers::Dense`]
//! and GPT-2's `Conv1D`) or `[d_out, d_in]` ([`WeightLayout::OutIn`], an embedding table used
//! as the tied output projection).

use crate::fused::{dense, dims, flex, is_fusable, values};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Dispatch, Flex};
use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[d_in, d_out]`, row-major.
    InOut,
    /// `[d_out, d_in]`, row-major.
    OutIn,
}

impl WeightLayout {
    /// `(d_in, d_out)` of a weight of shape `w`.
    fn sizes(self, w: &[usize]) -> (usize, usize) {
        assert_eq!(w.len(), 2, "a linear weight is a matrix");
        match self {
            WeightLayout::InOut => (w[0], w[1]),
            WeightLayout::OutIn => (w[1], w[0]),
        }
    }

    /// Strides `(along d_in, along d_out)` of the weight.
    fn strides(self, d_in: usize, d_out: usize) -> (usize, usize) {
        match self {
            WeightLayout::InOut => (d_out, 1),
            WeightLayout::OutIn => (1, d_in),
        }
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait LinearBackend: burn::backend::Backend {
    /// `x [..., d_in]` times the weight, plus the bias `[d_out]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self>;
    /// `x [..., d_in]` times the weight.
    fn fused_linear_unbiased(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self>;
}

/// Products at least this large (m·n·k) use every thread of the pool.
const PARALLEL_MIN: usize = 1 << 18;

/// `c = a·b` (`accumulate`: `c += a·b`) for an `m × k` matrix `a` and a `k × n` matrix `b`
/// given by their (row, column) strides, into the row-major `m × n` buffer at `c`.
///
/// # Safety
/// `c` must be valid for `m·n` writes (and reads when `accumulate`); the strides must address
/// only elements inside `a` and `b`.
unsafe fn product(
    mnk: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: *mut f32,
    accumulate: bool,
) {
    let (m, n, k) = mnk;
    let parallel = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN;
    // SAFETY: forwarded from the caller.
    unsafe {
        scaled_product(
            mnk,
            (a, a_strides),
            (b, b_strides),
            c,
            (accumulate, 1.0),
            parallel,
        )
    }
}

/// `c (+)= scale · a·b` as in [`product`], on all threads of the pool when `parallel`. The
/// strides are checked against `a` and `b`.
///
/// # Safety
/// `c` must be valid for `m·n` writes (and reads when `accumulate`).
pub(crate) unsafe fn scaled_product(
    (m, n, k): (usize, usize, usize),
    (a, (a_rs, a_cs)): (&[f32], (usize, usize)),
    (b, (b_rs, b_cs)): (&[f32], (usize, usize)),
    c: *mut f32,
    (accumulate, scale): (bool, f32),
    parallel: bool,
) {
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller. Without `accumulate` the kernel overwrites `c`
    // without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A fresh row-major `m × n` buffer holding `a·b` (see [`product`]), never zero-filled.
fn new_product(
    mnk: (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) -> Vec<f32> {
    let len = mnk.0 * mnk.1;
    let mut c = Vec::<f32>::with_capacity(len);
    // SAFETY: `c` has room for `m·n` values; the product overwrites all of them before the
    // length is set. The strides come from whole matrices of the stated shapes.
    unsafe {
        product(mnk, a, a_strides, b, b_strides, c.as_mut_ptr(), false);
        c.set_len(len);
    }
    c
}

/// Rows of `x` (the product of all but its last dimension) for inner size `d_in`.
fn rows_of(x_dims: &[usize]) -> usize {
    x_dims[..x_dims.len() - 1].iter().product()
}

/// `x W (+ b)` with its output shape.
fn linear_forward(
    x: &[f32],
    x_dims: &[usize],
    w: &[f32],
    w_dims: &[usize],
    bias: Option<&[f32]>,
    layout: WeightLayout,
) -> (Vec<f32>, Vec<usize>) {
    let (d_in, d_out) = layout.sizes(w_dims);
    assert_eq!(x_dims.last(), Some(&d_in), "input width matches the weight");
    let rows = rows_of(x_dims);
    let mut out_dims = x_dims.to_vec();
    *out_dims.last_mut().expect("non-empty shape") = d_out;
    let w_strides = layout.strides(d_in, d_out);
    let y = match bias {
        None => new_product((rows, d_out, d_in), x, (d_in, 1), w, w_strides),
        Some(b) => {
            assert_eq!(b.len(), d_out, "one bias per output");
            let len = rows * d_out;
            let mut y = Vec::<f32>::with_capacity(len);
            if d_out > 0 {
                y.spare_capacity_mut()[..len]
                    .par_chunks_mut(d_out)
                    .for_each(|row| {
                        for (slot, &v) in row.iter_mut().zip(b) {
                            slot.write(v);
                        }
                    });
            }
            // SAFETY: every one of the `len` values was written above; the product then
            // accumulates into the initialised buffer.
            unsafe {
                y.set_len(len);
                product(
                    (rows, d_out, d_in),
                    x,
                    (d_in, 1),
                    w,
                    w_strides,
                    y.as_mut_ptr(),
                    true,
                );
            }
            y
        }
    };
    (y, out_dims)
}

/// Rows per block of the bias-gradient sum: fixed, so the order of additions is too.
const BIAS_BLOCK_ROWS: usize = 64;

/// Column sums of a row-major `[rows, width]` matrix, in an order independent of threading.
fn column_sums(dy: &[f32], width: usize) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let partial: Vec<Vec<f32>> = dy
        .par_chunks(BIAS_BLOCK_ROWS * width)
        .map(|block| {
            let mut acc = vec![0f32; width];
            for row in block.chunks_exact(width) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![0f32; width];
    for p in partial {
        for (s, v) in sums.iter_mut().zip(p) {
            *s += v;
        }
    }
    sums
}

/// Which gradients a backward pass must produce.
#[derive(Clone, Copy)]
struct Needed {
    x: bool,
    w: bool,
    b: bool,
}

/// Gradients of `x`, the weight and the bias from the output gradient `dy`.
fn linear_backward(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    layout: WeightLayout,
    needed: Needed,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let (xv, wv, dyv) = (values(x), values(w), values(dy));
    let (x_dims, w_dims) = (dims(x), dims(w));
    let (d_in, d_out) = layout.sizes(&w_dims);
    let rows = rows_of(&x_dims);
    assert_eq!(dyv.len(), rows * d_out, "one output gradient per output");
    let (w_in, w_out) = layout.strides(d_in, d_out);
    // dx[r, i] = Σ_o dy[r, o] W[i, o]: the weight read transposed.
    let dx = needed.x.then(|| {
        flex(
            new_product((rows, d_in, d_out), dyv, (d_out, 1), wv, (w_out, w_in)),
            x_dims.clone(),
        )
    });
    // dW[i, o] = Σ_r x[r, i] dy[r, o], laid out as the weight is.
    let dw = needed.w.then(|| {
        let g = match layout {
            WeightLayout::InOut => new_product((d_in, d_out, rows), xv, (1, d_in), dyv, (d_out, 1)),
            WeightLayout::OutIn => new_product((d_out, d_in, rows), dyv, (1, d_out), xv, (d_in, 1)),
        };
        flex(g, w_dims.clone())
    });
    let db = needed.b.then(|| flex(column_sums(dyv, d_out), vec![d_out]));
    (dx, dw, db)
}

/// The forward product on dense host tensors.
fn forward(
    x: &FlexTensor,
    w: &FlexTensor,
    b: Option<&FlexTensor>,
    layout: WeightLayout,
) -> FlexTensor {
    let (y, shape) = linear_forward(
        values(x),
        &dims(x),
        values(w),
        &dims(w),
        b.map(values),
        layout,
    );
    flex(y, shape)
}

impl LinearBackend for Flex {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        forward(&dense(x), &dense(weight), Some(&dense(bias)), layout)
    }

    fn fused_linear_unbiased(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        forward(&dense(x), &dense(weight), None, layout)
    }
}

/// The backward step; the state is the input and the weight, dense and shared with the graph.
#[derive(Debug)]
struct LinearBackward {
    layout: WeightLayout,
}

impl Backward<Flex, 3> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [xn, wn, bn] = ops.parents;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let (x, w) = ops.state;
        let needed = Needed {
            x: xn.is_some(),
            w: wn.is_some(),
            b: bn.is_some(),
        };
        let (dx, dw, db) = linear_backward(&x, &w, &dy, self.layout, needed);
        let ids = [xn, wn, bn].map(|n| n.map(|n| n.id));
        register(grads, [(ids[0], dx), (ids[1], dw), (ids[2], db)]);
    }
}

/// Registers each computed gradient with its parent node.
fn register<const N: usize>(
    grads: &mut Gradients,
    pairs: [(Option<burn::backend::autodiff::NodeId>, Option<FlexTensor>); N],
) {
    for (node, grad) in pairs {
        if let (Some(node), Some(grad)) = (node, grad) {
            grads.register::<Flex>(node, grad);
        }
    }
}

impl Backward<Flex, 2> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [xn, wn] = ops.parents;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let (x, w) = ops.state;
        let needed = Needed {
            x: xn.is_some(),
            w: wn.is_some(),
            b: false,
        };
        let (dx, dw, _) = linear_backward(&x, &w, &dy, self.layout, needed);
        let ids = [xn, wn].map(|n| n.map(|n| n.id));
        register(grads, [(ids[0], dx), (ids[1], dw)]);
    }
}

impl<C: CheckpointStrategy> LinearBackend for Autodiff<Flex, C> {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        match (LinearBackward { layout })
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xh = dense(x.primitive().clone());
                let wh = dense(weight.primitive().clone());
                let out = forward(&xh, &wh, Some(&dense(bias.primitive().clone())), layout);
                prep.finish((xh, wh), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as LinearBackend>::fused_linear(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                layout,
            )),
        }
    }

    fn fused_linear_unbiased(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: WeightLayout,
    ) -> FloatTensor<Self> {
        match (LinearBackward { layout })
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xh = dense(x.primitive().clone());
                let wh = dense(weight.primitive().clone());
                let out = forward(&xh, &wh, None, layout);
                prep.finish((xh, wh), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<Flex as LinearBackend>::fused_linear_unbiased(
                    x.into_primitive(),
                    weight.into_primitive(),
                    layout,
                ))
            }
        }
    }
}

/// `x [..., d_in]` times `weight [d_in, d_out]`, plus `bias [d_out]`: fused on the CPU,
/// burn's `linear` elsewhere.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    if !is_fusable(&x.device()) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as LinearBackend>::fused_linear(
            x,
            weight,
            b.into_dispatch(),
            WeightLayout::InOut,
        ),
        None => <Dispatch as LinearBackend>::fused_linear_unbiased(x, weight, WeightLayout::InOut),
    })
}

/// `x [..., d_in]` times the transpose of `weight [d_out, d_in]` (a tied output projection):
/// fused on the CPU, composed elsewhere.
pub fn linear_out_in<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    if !is_fusable(&x.device()) {
        return burn::tensor::module::linear(x, weight.transpose(), None);
    }
    Tensor::from_dispatch(<Dispatch as LinearBackend>::fused_linear_unbiased(
        x.into_dispatch(),
        weight.into_dispatch(),
        WeightLayout::OutIn,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 1.3)
            .collect()
    }

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                "{what}[{i}]: {p} vs {q}"
            );
        }
    }

    /// The fused layer against burn's composed `matmul + bias`, values and all three
    /// gradients, for both weight layouts, with and without a bias, on a batched input
    /// whose rows are not a multiple of any tile.
    #[test]
    fn matches_the_composed_layer_and_its_gradients() {
        let device = Device::flex().autodiff();
        let (b, t, d_in, d_out) = (3, 37, 19, 23);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for with_bias in [true, false] {
                let run = |fused: bool| {
                    let x = Tensor::<3>::from_data(
                        TensorData::new(values(b * t * d_in, 0.1), [b, t, d_in]),
                        &device,
                    )
                    .require_grad();
                    let w_shape = match layout {
                        WeightLayout::InOut => [d_in, d_out],
                        WeightLayout::OutIn => [d_out, d_in],
                    };
                    let w = Tensor::<2>::from_data(
                        TensorData::new(values(d_in * d_out, 2.0), w_shape),
                        &device,
                    )
                    .require_grad();
                    let bias = Tensor::<1>::from_data(
                        TensorData::new(values(d_out, 5.0), [d_out]),
                        &device,
                    )
                    .require_grad();
                    let y = match (fused, layout) {
                        (true, WeightLayout::InOut) => {
                            linear(x.clone(), w.clone(), with_bias.then(|| bias.clone()))
                        }
                        (true, WeightLayout::OutIn) => {
                            let y = linear_out_in(x.clone(), w.clone());
                            if with_bias {
                                y + bias.clone().unsqueeze()
                            } else {
                                y
                            }
                        }
                        (false, _) => {
                            let wt = match layout {
                                WeightLayout::InOut => w.clone(),
                                WeightLayout::OutIn => w.clone().transpose(),
                            };
                            let y = x.clone().matmul(wt.unsqueeze());
                            if with_bias {
                                y + bias.clone().unsqueeze()
                            } else {
                                y
                            }
                        }
                    };
                    let probe = Tensor::<3>::from_data(
                        TensorData::new(values(b * t * d_out, 9.0), [b, t, d_out]),
                        &device,
                    );
                    let grads = (y.clone() * probe).sum().backward();
                    let bias_grad = bias.grad(&grads).map(host);
                    (
                        host(y),
                        host(x.grad(&grads).unwrap()),
                        host(w.grad(&grads).unwrap()),
                        bias_grad,
                    )
                };
                let (f, c) = (run(true), run(false));
                let what = format!("{layout:?}, bias {with_bias}");
                close(&f.0, &c.0, &format!("output ({what})"));
                close(&f.1, &c.1, &format!("input gradient ({what})"));
                close(&f.2, &c.2, &format!("weight gradient ({what})"));
                assert_eq!(f.3.is_some(), with_bias, "bias gradient present ({what})");
                if let (Some(a), Some(b)) = (&f.3, &c.3) {
                    close(a, b, &format!("bias gradient ({what})"));
                }
            }
        }
    }

    /// A frozen weight gets no gradient, and the input gradient is still right.
    #[test]
    fn frozen_weights_get_no_gradient() {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::from_data(TensorData::new(values(40, 0.3), [8, 5]), &device)
            .require_grad();
        let w = Tensor::<2>::from_data(TensorData::new(values(15, 1.0), [5, 3]), &device);
        let grads = linear(x.clone(), w.clone(), None).sum().backward();
        assert!(w.grad(&grads).is_none());
        let dx = host(x.grad(&grads).unwrap());
        // d(sum(x W))/dx[r, i] = Σ_o W[i, o].
        let wv = values(15, 1.0);
        let want: Vec<f32> = (0..8)
            .flat_map(|_| (0..5).map(|i| wv[i * 3..i * 3 + 3].iter().sum::<f32>()))
            .collect();
        close(&dx, &want, "input gradient");
    }

    /// The bias gradient sums in a fixed order: a large batch gives bit-identical sums
    /// from run to run, and matches a plain sequential sum closely.
    #[test]
    fn bias_gradient_is_deterministic() {
        let width = 7;
        let dy = values(width * 5000, 0.7);
        let first = column_sums(&dy, width);
        for _ in 0..5 {
            assert_eq!(column_sums(&dy, width), first);
        }
        let mut seq = vec![0f64; width];
        for row in dy.chunks_exact(width) {
            for (s, &v) in seq.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        for (a, b) in first.iter().zip(&seq) {
            assert!((*a as f64 - b).abs() < 1e-2, "{a} vs {b}");
        }
    }
}
