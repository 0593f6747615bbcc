//! Any byte string given to the safetensors reader is accepted with readable tensors, or
//! refused with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt_models::weights::WeightFile;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("smelt-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("model.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = WeightFile::open(&path) {
        for name in file.names() {
            if let Some(shape) = file.shape(&name) {
                let _ = file.f32(&name, &shape);
            }
        }
    }
});
