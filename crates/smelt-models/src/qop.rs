//! The quantized matrix product as a differentiable tensor operation.
//!
//! `y = x · Wᵀ` with `W` kept in its GGML encoding. The weight is a constant (it is never
//! trained), but the gradient flows through the product to `x`: `dx = dy · W`. This is what
//! lets LoRA adapters train on top of a quantized base model, whose layers sit between the
//! adapters and the loss.
//!
//! The operation is a burn backend extension implemented for the CPU backend (where the
//! quantized kernels run) and for autodiff over it; on other devices the weights are
//! dequantized when the model is loaded and this operation is never reached.

use crate::quant::QMatrix;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Dispatch, Flex};
use burn::tensor::{Tensor, TensorData};
use std::sync::Arc;

/// A quantized weight passed through the dispatch layer.
#[derive(Clone, Debug)]
pub struct QWeight(pub Arc<QMatrix>);

#[backend_extension(Flex, Autodiff)]
pub trait QuantLinearBackend: burn::backend::Backend {
    /// `[n, cols]` to `[n, rows]`: the product with the transposed quantized matrix.
    fn quant_linear(x: FloatTensor<Self>, weight: QWeight) -> FloatTensor<Self>;
}

fn host_rows(t: burn_flex::FlexTensor) -> (Vec<f32>, Vec<usize>) {
    let data = t.into_data();
    let shape = data.shape().to_vec();
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 activations");
    (values, shape)
}

fn flex_product(x: burn_flex::FlexTensor, w: &QMatrix) -> burn_flex::FlexTensor {
    let (values, shape) = host_rows(x);
    assert_eq!(shape.last(), Some(&w.cols), "quant_linear input width");
    let n = values.len() / w.cols;
    burn_flex::FlexTensor::from_data(TensorData::new(w.matmul(&values, n), [n, w.rows]))
}

impl QuantLinearBackend for Flex {
    fn quant_linear(x: FloatTensor<Self>, weight: QWeight) -> FloatTensor<Self> {
        flex_product(x, &weight.0)
    }
}

#[derive(Debug)]
struct QuantLinearBackward {
    weight: Arc<QMatrix>,
}

impl Backward<Flex, 1> for QuantLinearBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = parent {
            let (g, _) = host_rows(grad);
            let w = &self.weight;
            let n = g.len() / w.rows;
            let dx = w.matmul_transposed(&g, n);
            grads.register::<Flex>(
                node.id,
                burn_flex::FlexTensor::from_data(TensorData::new(dx, [n, w.cols])),
            );
        }
    }
}

impl<C: CheckpointStrategy> QuantLinearBackend for Autodiff<Flex, C> {
    fn quant_linear(x: FloatTensor<Self>, weight: QWeight) -> FloatTensor<Self> {
        let op = QuantLinearBackward {
            weight: weight.0.clone(),
        };
        match op.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = flex_product(x.primitive().clone(), &weight.0);
                prep.finish((), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(flex_product(x.into_primitive(), &weight.0)),
        }
    }
}

/// `x · Wᵀ` for `x` of shape `[n, w.cols]`, differentiable with respect to `x`.
pub fn quant_linear(x: Tensor<2>, w: &Arc<QMatrix>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as QuantLinearBackend>::quant_linear(
        x.into_dispatch(),
        QWeight(w.clone()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, GgmlType};
    use burn::tensor::Device;

    fn matrix(rows: usize, cols: usize) -> Arc<QMatrix> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
            .collect();
        let bytes = quantize(GgmlType::Q8_0, &values).expect("Q8_0 encodes");
        Arc::new(QMatrix::new(GgmlType::Q8_0, rows, cols, bytes).expect("sizes agree"))
    }

    #[test]
    fn forward_and_input_gradient_match_the_dequantized_product() {
        let (rows, cols, n) = (24, 64, 5);
        let w = matrix(rows, cols);
        let dense = w.dequantize();
        let device = Device::flex().autodiff();
        let xs: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let r: Vec<f32> = (0..n * rows).map(|i| (i as f32 * 0.11).cos()).collect();
        let x =
            Tensor::<2>::from_data(TensorData::new(xs.clone(), [n, cols]), &device).require_grad();
        let weights = Tensor::<2>::from_data(TensorData::new(r.clone(), [n, rows]), &device);
        let y = quant_linear(x.clone(), &w);
        let y_host = y.clone().into_data().try_into_vec::<f32>().unwrap();
        for i in 0..n {
            for o in 0..rows {
                let expect: f32 = (0..cols)
                    .map(|k| xs[i * cols + k] * dense[o * cols + k])
                    .sum();
                assert!((y_host[i * rows + o] - expect).abs() < 1e-4);
            }
        }
        let grads = (y * weights).sum().backward();
        let dx = x.grad(&grads).expect("x gets a gradient");
        let dx = dx.into_data().try_into_vec::<f32>().unwrap();
        for i in 0..n {
            for k in 0..cols {
                let expect: f32 = (0..rows)
                    .map(|o| r[i * rows + o] * dense[o * cols + k])
                    .sum();
                assert!(
                    (dx[i * cols + k] - expect).abs() < 1e-4,
                    "dx[{i},{k}] = {} vs {expect}",
                    dx[i * cols + k]
                );
            }
        }
    }

    #[test]
    fn the_transposed_product_spans_several_tiles() {
        let (rows, cols, n) = (2500, 64, 3);
        let w = matrix(rows, cols);
        let dense = w.dequantize();
        let g: Vec<f32> = (0..n * rows).map(|i| (i as f32 * 0.013).sin()).collect();
        let dx = w.matmul_transposed(&g, n);
        for i in 0..n {
            for k in 0..cols {
                let expect: f32 = (0..rows)
                    .map(|o| g[i * rows + o] * dense[o * cols + k])
                    .sum();
                assert!(
                    (dx[i * cols + k] - expect).abs() < 1e-3,
                    "{} vs {expect}",
                    dx[i * cols + k]
                );
            }
        }
    }

    #[test]
    fn works_without_autodiff() {
        let w = matrix(8, 32);
        let x = Tensor::<2>::ones([3, 32], &Device::flex());
        assert_eq!(quant_linear(x, &w).dims(), [3, 8]);
    }
}
