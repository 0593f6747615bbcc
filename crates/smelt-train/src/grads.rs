//! Gradients gathered by parameter path, accumulated across micro-batches and clipped by
//! their global norm.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};
use std::collections::BTreeMap;

/// Gradients of a module's trainable parameters, flattened, keyed by the parameter's path
/// in the module tree (`bert.layers.0.query.weight`).
#[derive(Default, Clone)]
pub struct GradStore {
    pub grads: BTreeMap<String, Tensor<1>>,
}

struct Collector<'a> {
    path: Vec<String>,
    grads: &'a Gradients,
    out: BTreeMap<String, Tensor<1>>,
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor: &Tensor<D> = param;
        if let Some(grad) = tensor.grad(self.grads) {
            let n = grad.shape().num_elements();
            self.out.insert(self.path.join("."), grad.reshape([n]));
        }
    }
}

/// Paths of every float parameter of `module`, in visiting order, with their shapes.
pub fn parameter_paths<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    struct Paths {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>)>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push((self.path.join("."), param.dims().to_vec()));
        }
    }
    let mut visitor = Paths {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

impl GradStore {
    /// Takes the gradients of `module`'s parameters out of a backward pass.
    pub fn collect<M: Module>(module: &M, grads: &Gradients) -> Self {
        let mut collector = Collector {
            path: Vec::new(),
            grads,
            out: BTreeMap::new(),
        };
        module.visit(&mut collector);
        Self {
            grads: collector.out,
        }
    }

    /// Adds another micro-batch's gradients.
    pub fn accumulate(&mut self, other: GradStore) {
        for (path, grad) in other.grads {
            let sum = match self.grads.remove(&path) {
                Some(existing) => existing + grad,
                None => grad,
            };
            self.grads.insert(path, sum);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The L2 norm of all gradients together.
    pub fn global_norm(&self) -> f32 {
        let mut total: Option<Tensor<1>> = None;
        for grad in self.grads.values() {
            let sq = grad.clone().powi_scalar(2).sum();
            total = Some(match total {
                Some(t) => t + sq,
                None => sq,
            });
        }
        total.map_or(0.0, |t| t.into_scalar::<f32>().sqrt())
    }

    /// Scales every gradient so that the global norm is at most `max_norm` (as PyTorch's
    /// `clip_grad_norm_`, with its 1e-6 guard). Returns the norm before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f32) -> f32 {
        let norm = self.global_norm();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            for grad in self.grads.values_mut() {
                *grad = grad.clone().mul_scalar(factor);
            }
        }
        norm
    }
}
