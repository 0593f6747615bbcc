//! Device selection. The backend travels with the device; nothing else in smelt names one.

use crate::error::{ModelError, Result};
pub use burn::tensor::Device;

#[cfg(feature = "cuda")]
const OTHERS: &str = ", `cuda` or `cuda:N`";
#[cfg(all(not(feature = "cuda"), feature = "wgpu"))]
const OTHERS: &str = " or `wgpu`";
#[cfg(all(not(feature = "cuda"), not(feature = "wgpu")))]
const OTHERS: &str = " (this build has no GPU backend; rebuild with `--features cuda` or `wgpu`)";

/// Parses a device name given by the user: `cpu` (burn's flex backend), and, when smelt is
/// built with the matching feature, `cuda[:N]` or `wgpu`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        other if other == "cuda" || other.starts_with("cuda:") => {
            let index = other
                .strip_prefix("cuda:")
                .map(|i| i.parse::<usize>())
                .transpose()
                .map_err(|_| ModelError::UnknownDevice(name.to_string(), OTHERS))?
                .unwrap_or(0);
            Ok(Device::cuda(index))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        other => Err(ModelError::UnknownDevice(other.to_string(), OTHERS)),
    }
}
