//! AdamW with decoupled weight decay (Loshchilov & Hutter), as PyTorch's `torch.optim.AdamW`.
//! Biases and normalisation parameters get no weight decay.

use crate::grads::GradStore;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor};
use smelt_models::fused_optim::{self, AdamStep};
use smelt_models::weights::{tensor_from_vec, NamedTensor, WeightFile};
use std::collections::BTreeMap;

/// AdamW hyper-parameters. Defaults are PyTorch's, except the weight decay, which is the
/// usual fine-tuning value.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether the parameter at `path` is decayed: not biases, not normalisation parameters.
pub fn decays(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let is_norm = path.split('.').any(|seg| seg.contains("norm"));
    !(last == "bias" || is_norm)
}

/// First and second moments of one parameter, flattened.
#[derive(Clone)]
struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

/// One AdamW update from tensor operations, for devices without the fused kernel:
/// `(parameter, m, v)`.
fn composed_adamw(
    param: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    s: AdamStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let param = if s.weight_decay != 0.0 {
        param.mul_scalar(1.0 - s.lr * s.weight_decay)
    } else {
        param
    };
    let m = m.mul_scalar(s.beta1) + grad.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + grad.powi_scalar(2).mul_scalar(1.0 - s.beta2);
    let bias1 = 1.0 - s.beta1.powi(s.t);
    let bias2 = 1.0 - s.beta2.powi(s.t);
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(bias2.sqrt())
        .add_scalar(s.epsilon);
    let updated = param - m.clone().div(denom).mul_scalar(s.lr / bias1);
    (updated, m, v)
}

/// The optimizer and its state.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates done.
    pub step: u64,
    moments: BTreeMap<String, Moments>,
}

struct Update<'a> {
    path: Vec<String>,
    optim: &'a mut AdamW,
    grads: &'a GradStore,
    lr: f64,
}

impl ModuleMapper for Update<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let Some(grad) = self.grads.grads.get(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let value = tensor.inner().reshape([n]);
        let updated = self.optim.update(&path, value, grad.clone(), self.lr);
        let mut restored = Tensor::from_inner(updated.reshape(shape));
        if require_grad {
            restored = restored.require_grad();
        }
        Param::from_mapped_value(id, restored, mapper)
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step<M: Module>(&mut self, module: M, grads: &GradStore, lr: f64) -> M {
        self.step += 1;
        let mut update = Update {
            path: Vec::new(),
            optim: self,
            grads,
            lr,
        };
        module.map(&mut update)
    }

    fn update(&mut self, path: &str, param: Tensor<1>, grad: Tensor<1>, lr: f64) -> Tensor<1> {
        let c = self.config;
        let (m, v) = match self.moments.remove(path) {
            Some(state) => (state.m, state.v),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let step = AdamStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            epsilon: c.epsilon,
            weight_decay: if decays(path) { c.weight_decay } else { 0.0 },
            t: self.step as i32,
        };
        let (updated, m, v) =
            match fused_optim::adamw(param.clone(), grad.clone(), m.clone(), v.clone(), step) {
                Some(fused) => fused,
                None => composed_adamw(param, grad, m, v, step),
            };
        self.moments.insert(path.to_string(), Moments { m, v });
        updated
    }

    /// The state as named tensors (`m.<path>`, `v.<path>`) for a checkpoint.
    pub fn export(&self) -> smelt_models::Result<Vec<NamedTensor>> {
        let mut out = Vec::with_capacity(self.moments.len() * 2);
        for (path, state) in &self.moments {
            out.push(NamedTensor::from_tensor(
                format!("m.{path}"),
                state.m.clone(),
            )?);
            out.push(NamedTensor::from_tensor(
                format!("v.{path}"),
                state.v.clone(),
            )?);
        }
        Ok(out)
    }

    /// Restores the state written by [`AdamW::export`], checking it against the module's
    /// parameters: `params` are (path, shape) pairs as given by
    /// [`crate::grads::parameter_paths`].
    pub fn import(
        &mut self,
        file: &WeightFile,
        params: &[(String, Vec<usize>)],
        step: u64,
        device: &Device,
    ) -> smelt_models::Result<()> {
        self.step = step;
        self.moments.clear();
        for (path, shape) in params {
            let name = format!("m.{path}");
            if !file.contains(&name) {
                continue; // never updated (frozen, or no gradient yet)
            }
            let n: usize = shape.iter().product();
            let m = file.f32(&name, &[n])?;
            let v = file.f32(&format!("v.{path}"), &[n])?;
            self.moments.insert(
                path.clone(),
                Moments {
                    m: tensor_from_vec(m, [n], device),
                    v: tensor_from_vec(v, [n], device),
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU update and the composed one agree over several steps, with and
    /// without weight decay.
    #[test]
    fn fused_update_matches_the_composed_one() {
        let device = Device::flex();
        let n = 40_000;
        let vals = |seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.013 + seed).sin() * 0.7)
                .collect()
        };
        let t = |v: Vec<f32>| tensor_from_vec(v, [n], &device);
        for weight_decay in [0.0, 0.01] {
            let (mut pf, mut mf, mut vf) = (t(vals(1.0)), t(vec![0.0; n]), t(vec![0.0; n]));
            let (mut pc, mut mc, mut vc) = (pf.clone(), mf.clone(), vf.clone());
            for step in 1..=4 {
                let g = t(vals(step as f32 * 3.1));
                let s = AdamStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    epsilon: 1e-8,
                    weight_decay,
                    t: step,
                };
                (pf, mf, vf) = fused_optim::adamw(pf, g.clone(), mf, vf, s).expect("CPU");
                (pc, mc, vc) = composed_adamw(pc, g, mc, vc, s);
            }
            let host = |x: &Tensor<1>| x.clone().into_data().try_to_vec::<f32>().unwrap();
            for (what, a, b) in [("param", &pf, &pc), ("m", &mf, &mc), ("v", &vf, &vc)] {
                // Parameters are of order 1; the moments (the second ones of order 1e-3 and
                // below) are compared relative to their size.
                for (x, y) in host(a).iter().zip(host(b)) {
                    let tol = match what {
                        "param" => 1e-6 * (1.0 + y.abs()),
                        _ => 2e-6 * y.abs() + 1e-12,
                    };
                    assert!(
                        (x - y).abs() <= tol,
                        "{what}: {x} vs {y} (decay {weight_decay})"
                    );
                }
            }
        }
    }

    #[test]
    fn no_decay_for_biases_and_norms() {
        assert!(decays("bert.layers.0.query.weight"));
        assert!(decays("bert.embeddings.word_embeddings"));
        assert!(!decays("bert.layers.0.query.bias"));
        assert!(!decays("bert.layers.0.attention_norm.gamma"));
        assert!(!decays("bert.embeddings.layer_norm.beta"));
    }
}
