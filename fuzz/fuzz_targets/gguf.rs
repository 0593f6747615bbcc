//! Any byte string given to the GGUF reader is either accepted, with every tensor inside the
//! buffer and decodable, or refused with an error. Never a panic or an oversized allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt_models::gguf::GgufFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data.to_vec()) {
        for t in &file.tensors {
            let bytes = file.tensor_bytes(t);
            assert_eq!(bytes.len(), t.bytes);
            let values = smelt_models::quant::dequantize(t.ty, bytes);
            assert_eq!(values.len(), t.elements());
        }
        let _ = smelt_models::causal::CausalLm::load_gguf(&file, &Default::default());
    }
});
