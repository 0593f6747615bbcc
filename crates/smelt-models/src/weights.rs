//! Reading and writing safetensors weight files, with every failure named by file and tensor.

use crate::error::{ModelError, Result};
use crate::fsutil::write_atomic;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, Metadata, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A safetensors file read into memory and validated (header, offsets, sizes).
pub struct WeightFile {
    path: PathBuf,
    bytes: Vec<u8>,
    header_len: usize,
    metadata: Metadata,
}

impl WeightFile {
    /// Reads and validates `path`. A truncated file, a header that is not JSON or tensor
    /// offsets outside the file are reported as [`ModelError::BadWeights`].
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |message: String| ModelError::BadWeights {
            path: path.to_path_buf(),
            message,
        };
        // `deserialize` checks that the offsets tile the data section exactly.
        SafeTensors::deserialize(&bytes).map_err(|e| bad(describe(&e, bytes.len())))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| bad(describe(&e, bytes.len())))?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            header_len,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors in the file.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.metadata.info(name).map(|i| i.shape.clone())
    }

    /// The stored dtype of tensor `name` (`F32`, `BF16`, ...), if present.
    pub fn dtype(&self, name: &str) -> Option<String> {
        self.metadata.info(name).map(|i| format!("{:?}", i.dtype))
    }

    /// The `__metadata__` map of the file.
    pub fn user_metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    /// The dtype and bytes of tensor `name`, checking that its shape is `expected`.
    fn raw(&self, name: &str, expected: &[usize]) -> Result<(Dtype, &[u8])> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        // Offsets were checked against the file size by `SafeTensors::deserialize` in `open`.
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        Ok((info.dtype, &self.bytes[start..end]))
    }

    /// Values of tensor `name` as f32, checking that its shape is `expected`.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (dtype, raw) = self.raw(name, expected)?;
        let values = match dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(values)
    }

    /// Values of an integer tensor (I64 or I32) as i64, checking its shape.
    pub fn i64(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>> {
        let (dtype, raw) = self.raw(name, expected)?;
        match dtype {
            Dtype::I64 => Ok(raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()),
            Dtype::I32 => Ok(raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect()),
            other => Err(ModelError::UnsupportedDtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// Tensor `name` on `device`, checking its shape.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>> {
        let values = self.f32(name, &shape)?;
        Ok(tensor_from_vec(values, shape, device))
    }
}

fn describe(err: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match err {
        E::HeaderTooSmall => format!("file of {file_len} bytes is too small to hold a header"),
        E::InvalidHeaderLength => {
            format!("header length is larger than the file ({file_len} bytes): truncated?")
        }
        E::MetadataIncompleteBuffer => format!(
            "tensor data ends before the offsets in the header say ({file_len} bytes): \
             the file is truncated"
        ),
        other => other.to_string(),
    }
}

/// Builds a tensor from row-major values.
pub fn tensor_from_vec<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Reads a tensor back to the host as row-major f32 values.
pub fn tensor_to_vec<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::Readback(format!("{e:?}")))
}

/// A named host tensor on its way to a file.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape,
            values,
        }
    }

    /// Reads a device tensor back to the host.
    pub fn from_tensor<const D: usize>(name: impl Into<String>, tensor: Tensor<D>) -> Result<Self> {
        let shape = tensor.dims().to_vec();
        Ok(Self::new(name, shape, tensor_to_vec(tensor)?))
    }
}

/// Writes f32 tensors to a safetensors file atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| {
            ModelError::BadWeights {
                path: path.to_path_buf(),
                message: format!("tensor `{}`: {e}", t.name),
            }
        })?;
        views.push((t.name.clone(), view));
    }
    let serialized =
        safetensors::serialize(views, metadata).map_err(|e| ModelError::BadWeights {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &serialized)
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
