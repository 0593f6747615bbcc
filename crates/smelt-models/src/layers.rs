//! Small building blocks shared by the models, each loadable from and exportable to
//! Hugging Face tensor names.

use crate::error::Result;
use crate::init::HostInit;
use crate::weights::{tensor_from_vec, tensor_to_vec, transpose, NamedTensor, WeightFile};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

/// A fully connected layer `y = x W + b`.
///
/// `weight` is stored `[d_in, d_out]` (burn's layout); Hugging Face files store `[d_out, d_in]`,
/// so loading and exporting transpose.
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl Dense {
    /// Loads `{prefix}.weight` `[d_out, d_in]` and `{prefix}.bias` `[d_out]`.
    pub fn load(
        file: &WeightFile,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Self> {
        let weight = file.f32(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let bias = file.f32(&format!("{prefix}.bias"), &[d_out])?;
        Ok(Self::from_host(
            &transpose(&weight, d_out, d_in),
            bias,
            d_in,
            d_out,
            device,
        ))
    }

    /// A new layer with N(0, std²) weights and zero bias, as Hugging Face initialises heads.
    pub fn init(init: &mut HostInit, d_in: usize, d_out: usize, std: f32, device: &Device) -> Self {
        let weight = init.normal(d_in * d_out, std);
        Self::from_host(&weight, vec![0.0; d_out], d_in, d_out, device)
    }

    /// Builds a layer from a row-major `[d_in, d_out]` weight and a `[d_out]` bias.
    pub fn from_host(
        weight_in_out: &[f32],
        bias: Vec<f32>,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Self {
        Self {
            weight: Param::from_tensor(tensor_from_vec(
                weight_in_out.to_vec(),
                [d_in, d_out],
                device,
            )),
            bias: Param::from_tensor(tensor_from_vec(bias, [d_out], device)),
        }
    }

    /// `[..., d_in]` to `[..., d_out]`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        crate::fused_linear::linear(input, self.weight.val(), Some(self.bias.val()))
    }

    /// The layer's tensors under Hugging Face names and layout.
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let [d_in, d_out] = self.weight.dims();
        let weight = tensor_to_vec(self.weight.val())?;
        out.push(NamedTensor::new(
            format!("{prefix}.weight"),
            vec![d_out, d_in],
            transpose(&weight, d_in, d_out),
        ));
        out.push(NamedTensor::from_tensor(
            format!("{prefix}.bias"),
            self.bias.val(),
        )?);
        Ok(())
    }
}

/// Layer normalisation over the last dimension, with scale and shift.
#[derive(Module, Debug)]
pub struct Norm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub epsilon: f64,
}

impl Norm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[size]`.
    pub fn load(
        file: &WeightFile,
        prefix: &str,
        size: usize,
        epsilon: f64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            gamma: Param::from_tensor(file.tensor(&format!("{prefix}.weight"), [size], device)?),
            beta: Param::from_tensor(file.tensor(&format!("{prefix}.bias"), [size], device)?),
            epsilon,
        })
    }

    /// `[..., size]` to `[..., size]`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        crate::fused::layer_norm(input, self.gamma.val(), self.beta.val(), self.epsilon)
    }

    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        out.push(NamedTensor::from_tensor(
            format!("{prefix}.weight"),
            self.gamma.val(),
        )?);
        out.push(NamedTensor::from_tensor(
            format!("{prefix}.bias"),
            self.beta.val(),
        )?);
        Ok(())
    }
}
